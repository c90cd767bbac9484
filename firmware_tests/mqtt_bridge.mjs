// The MQTT side of run.mjs --mqtt: a real MQTT client (npm package mqtt) for a MicroPython script,
// as the JavaScript module `mqttbridge` (mp/jsmqtt.py puts umqtt.simple's API on it). Payloads cross
// through two files of the port's in-memory filesystem (INBOX, OUTBOX): JavaScript bytes handed to
// Python directly would become proxies, not bytes. Incoming messages wait here, in JavaScript's
// memory, until the script asks for the next one: MicroPython's heap holds one message at a time,
// as a board's socket buffer would.

import fs from "node:fs";
import path from "node:path";
import mqtt from "mqtt";

export const IDLE = 2;
const INBOX = "/tmp/mqtt_in";
const OUTBOX = "/tmp/mqtt_out";

function copyOut(FS, source, target) {
    const st = FS.stat(source);
    if (FS.isDir(st.mode)) {
        fs.mkdirSync(target, { recursive: true });
        for (const name of FS.readdir(source)) {
            if (name !== "." && name !== "..") copyOut(FS, source + "/" + name, path.join(target, name));
        }
    } else {
        fs.writeFileSync(target, FS.readFile(source));
    }
}

export class Bridge {
    constructor(mp, opts) {
        this.mp = mp;
        this.opts = opts;
        this.client = null;
        this.queue = [];
        this.matched = 0;  // messages handed over whose topic contains the --crash-on text
        this.stop = false;
        this.wake = null;
        mp.FS.mkdirTree("/tmp");
        process.on("SIGTERM", () => { this.stop = true; this.notify(); });
    }

    module() {
        return {
            connect: (clientId, keepalive, willTopic, willRetain, willQos) =>
                this.connect(clientId, keepalive, willTopic, willRetain, willQos),
            subscribe: (topic, qos) => { this.client.subscribe(topic, { qos }); },
            publish: (topic, retain, qos) => {
                this.client.publish(topic, Buffer.from(this.mp.FS.readFile(OUTBOX)), { retain: !!retain, qos });
            },
            next: () => this.next(),
            disconnect: () => { this.client.end(); },
        };
    }

    connect(clientId, keepalive, willTopic, willRetain, willQos) {
        const options = { clientId, clean: true, keepalive: keepalive || 60, reconnectPeriod: 1000 };
        if (willTopic) {
            options.will = { topic: willTopic, payload: Buffer.from(this.mp.FS.readFile(OUTBOX)),
                             retain: !!willRetain, qos: willQos };
        }
        this.client = mqtt.connect(this.opts.mqtt, options);
        this.client.on("message", (topic, payload) => { this.queue.push([topic, payload]); this.notify(); });
        this.client.on("error", (e) => process.stderr.write("mqtt: " + e.message + "\n"));
    }

    next() {
        const crash = this.opts.crashOn;
        if (crash !== null && this.matched >= crash[1]) this.powerLoss();
        const m = this.queue.shift();
        if (m === undefined) return null;
        if (crash !== null && m[0].includes(crash[0])) this.matched++;
        this.mp.FS.writeFile(INBOX, m[1]);
        return m[0];
    }

    notify() {
        if (this.wake !== null) {
            const wake = this.wake;
            this.wake = null;
            wake();
        }
    }

    async loop(fn) {
        while (!this.stop) {
            const r = fn();
            if (!r) break;
            // JavaScript's event loop runs here (the socket is read); an await in JavaScript keeps
            // nothing in MicroPython's heap.
            if (r === IDLE && this.queue.length === 0) {
                await new Promise((resolve) => { this.wake = resolve; setTimeout(() => this.notify(), 20); });
            } else {
                await new Promise((resolve) => setImmediate(resolve));
            }
        }
    }

    persist() {
        if (this.opts.persist === null) return;
        const [host, target] = this.opts.persist;
        fs.rmSync(host, { recursive: true, force: true });
        copyOut(this.mp.FS, target, host);
    }

    powerLoss() {
        this.persist();
        if (this.client !== null) this.client.stream.destroy();
        process.stdout.write("run.mjs: power loss after " + this.matched + " messages\n");
        process.exit(137);
    }

    end() {
        this.persist();
        if (this.client !== null) this.client.end();
    }
}
