#!/usr/bin/env node
// Runs a MicroPython script under the official MicroPython WebAssembly port (npm package
// @micropython/micropython-webassembly-pyscript) with a fixed heap, after copying host files into
// the port's (Emscripten, in-memory) filesystem. Relays the script's output and exit status.
//
//   node run.mjs [--heap SIZE] [--pystack WORDS] [--copy HOST=MP]... [--loop NAME]
//                [--mqtt URL [--persist HOST=MP] [--crash-on TEXT:N]] SCRIPT.py [ARG...]
//
//   --heap SIZE      MicroPython GC heap in bytes, or with a k / m suffix (default 1m)
//   --pystack WORDS  MicroPython Python-stack size in words (default 8192)
//   --copy HOST=MP   copy a host file or directory tree (skipping __pycache__) to path MP;
//                    MicroPython's sys.path includes /lib, so --copy ../decoder_core=/lib/decoder_core
//                    makes the package importable
//   --loop NAME      after the script, call its global function NAME() until it returns a false
//                    value: a device's main loop calling into Python once per event. This port
//                    frees garbage only once control has been back in JavaScript (mp/heap.py);
//                    returning from each call does that without an await (each await of a promise
//                    keeps ~29 bytes of the heap for good in this port: a loop of awaits leaks)
//   --mqtt URL       a real MQTT connection (npm package mqtt) for the script: the JavaScript module
//                    `mqttbridge` (mqtt_bridge.mjs; mp/jsmqtt.py puts umqtt.simple's API on it).
//                    The --loop function then returns True (call again), IDLE (2: nothing to do,
//                    called again when a message arrives or after 20 ms) or a false value (stop);
//                    between calls JavaScript runs its event loop. SIGTERM ends the loop.
//   --persist HOST=MP  with --mqtt: the device's flash. HOST (a directory) is copied to MP before the
//                    script runs and MP back to HOST when it ends, or is killed by --crash-on
//   --crash-on TEXT:N  with --mqtt: power loss once N messages whose topic contains TEXT were handed
//                    to the script: MP is saved to HOST as it is, the connection dropped without a
//                    DISCONNECT (the broker publishes the last will), exit status 137
//
// The script runs with top-level `await` allowed, so it can drive MicroPython's asyncio (whose
// event loop this port hands to JavaScript's). sys.argv is [SCRIPT, ARG...]. Exit status: the
// script's SystemExit code, 0 when it ends normally, 1 for an uncaught Python exception (its
// traceback goes to stderr), 2 for a usage error or a failure of the port itself.

import fs from "node:fs";
import path from "node:path";

const USAGE = "usage: node run.mjs [--heap SIZE] [--pystack WORDS] [--copy HOST=MP]... [--loop NAME]\n"
    + "                   [--mqtt URL [--persist HOST=MP] [--crash-on TEXT:N]] SCRIPT.py [ARG...]";

function fail(message) {
    process.stderr.write("run.mjs: " + message + "\n");
    process.exit(2);
}

function parseSize(text) {
    const m = /^(\d+)([kKmM]?)$/.exec(text);
    if (!m) fail("bad size '" + text + "'");
    const unit = { "": 1, k: 1024, m: 1048576 }[m[2].toLowerCase()];
    return parseInt(m[1], 10) * unit;
}

function parseArgs(argv) {
    const opts = { heap: 1048576, pystack: 8192, copies: [], loop: null, mqtt: null, persist: null, crashOn: null,
                   script: null, args: [] };
    let i = 0;
    for (; i < argv.length; i++) {
        const a = argv[i];
        if (["--heap", "--pystack", "--copy", "--loop", "--mqtt", "--persist", "--crash-on"].includes(a)) {
            if (i + 1 >= argv.length) fail(a + " needs a value\n" + USAGE);
            const v = argv[++i];
            if (a === "--heap") opts.heap = parseSize(v);
            else if (a === "--pystack") opts.pystack = parseSize(v);
            else if (a === "--loop") opts.loop = v;
            else if (a === "--mqtt") opts.mqtt = v;
            else if (a === "--crash-on") {
                const colon = v.lastIndexOf(":");
                if (colon <= 0 || !/^\d+$/.test(v.slice(colon + 1))) fail("--crash-on wants TEXT:N, got '" + v + "'");
                opts.crashOn = [v.slice(0, colon), parseInt(v.slice(colon + 1), 10)];
            } else {
                const eq = v.indexOf("=");
                if (eq <= 0 || !v.slice(eq + 1).startsWith("/")) fail(a + " wants HOST=/abs/mp/path, got '" + v + "'");
                if (a === "--persist") opts.persist = [v.slice(0, eq), v.slice(eq + 1)];
                else opts.copies.push([v.slice(0, eq), v.slice(eq + 1)]);
            }
        } else if (a.startsWith("--")) {
            fail("unknown option " + a + "\n" + USAGE);
        } else {
            break;
        }
    }
    if (i >= argv.length) fail(USAGE);
    if ((opts.persist || opts.crashOn) && !opts.mqtt) fail("--persist and --crash-on go with --mqtt");
    opts.script = argv[i];
    opts.args = argv.slice(i + 1);
    return opts;
}

function copyInto(FS, host, target) {
    const st = fs.statSync(host);
    if (st.isDirectory()) {
        FS.mkdirTree(target);
        for (const name of fs.readdirSync(host).sort()) {
            if (name === "__pycache__") continue;
            copyInto(FS, path.join(host, name), target + "/" + name);
        }
    } else if (st.isFile()) {
        FS.mkdirTree(path.posix.dirname(target));
        FS.writeFile(target, fs.readFileSync(host));
    }
}

async function main() {
    const opts = parseArgs(process.argv.slice(2));
    let loadMicroPython;
    try {
        ({ loadMicroPython } = await import("@micropython/micropython-webassembly-pyscript"));
    } catch (e) {
        fail("the npm package @micropython/micropython-webassembly-pyscript is not installed "
             + "(npm ci --prefix firmware_tests): " + e.message);
    }
    if (!fs.existsSync(opts.script)) fail("script not found: " + opts.script);
    const code = fs.readFileSync(opts.script, "utf8");
    const out = (s) => process.stdout.write(s + "\n");
    const err = (s) => process.stderr.write(s + "\n");
    const mp = await loadMicroPython({ heapsize: opts.heap, pystack: opts.pystack, stdout: out, stderr: err });
    for (const [host, target] of opts.copies) {
        if (!fs.existsSync(host)) fail("--copy source does not exist: " + host);
        copyInto(mp.FS, host, target);
    }
    if (opts.persist !== null) {
        if (fs.existsSync(opts.persist[0])) copyInto(mp.FS, opts.persist[0], opts.persist[1]);
        else mp.FS.mkdirTree(opts.persist[1]);
    }
    let bridge = null;
    if (opts.mqtt !== null) {
        const { Bridge } = await import("./mqtt_bridge.mjs");
        bridge = new Bridge(mp, opts);
        mp.registerJsModule("mqttbridge", bridge.module());
    }
    // sys.argv as JSON: MicroPython's json parses it without touching the script's globals.
    mp.runPython("import sys, json\nsys.argv[:] = json.loads(" + JSON.stringify(JSON.stringify(
        [opts.script, ...opts.args])) + ")\ndel sys, json");
    let status = 0;
    try {
        await mp.runPythonAsync(code);
        if (opts.loop !== null) {
            const fn = mp.globals.get(opts.loop);
            if (typeof fn !== "function") fail("--loop: the script defines no function " + opts.loop);
            if (bridge !== null) await bridge.loop(fn);
            else while (fn()) { /* one event per call */ }
        }
    } catch (e) {
        if (e && e.name === "PythonError") {
            if (e.type === "SystemExit") {
                // The port reports SystemExit as a traceback whose last line is "SystemExit: CODE".
                const m = /SystemExit(?:: (.*))?\s*$/.exec(e.message);
                const arg = m && m[1] !== undefined ? m[1].trim() : "";
                if (arg === "" || arg === "None") status = 0;
                else if (/^-?\d+$/.test(arg)) status = parseInt(arg, 10) & 0xff;
                else { err(arg); status = 1; }
            } else {
                process.stderr.write(e.message);
                status = 1;
            }
        } else {
            err("run.mjs: MicroPython failed: " + (e && e.message ? e.message : String(e)));
            status = 2;
        }
    }
    // Lines the script left without a final newline are still in the port's line buffers.
    const M = mp._module;
    for (const [buf, write] of [[M._stdoutBuffer, process.stdout], [M._stderrBuffer, process.stderr]]) {
        if (buf && buf.length) write.write(new TextDecoder().decode(new Uint8Array(buf)) + "\n");
    }
    if (bridge !== null) bridge.end();
    process.exitCode = status;
}

await main();
