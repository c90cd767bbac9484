# umqtt.simple's MQTTClient API on run.mjs --mqtt's real MQTT client (mqtt_bridge.mjs), for the
# MicroPython WebAssembly port, which has no sockets: what nnc_device.agent needs of a client, as
# umqtt.simple gives it (topics and payloads as bytes). The connection is mqtt.js's (it connects,
# pings and reconnects by itself); check_msg hands over one message that has arrived, and wait_msg
# does the same without blocking: the JavaScript loop waits for messages between calls.
import mqttbridge

INBOX = "/tmp/mqtt_in"
OUTBOX = "/tmp/mqtt_out"


def _outbox(data):
    with open(OUTBOX, "wb") as f:
        f.write(data)


class MQTTClient:
    def __init__(self, client_id, server=None, port=0, user=None, password=None, keepalive=0, ssl=False,
                 ssl_params=None):
        self.client_id = client_id
        self.keepalive = 0  # mqtt.js pings
        self.cb = None
        self.lw = None

    def set_callback(self, f):
        self.cb = f

    def set_last_will(self, topic, msg, retain=False, qos=0):
        self.lw = (topic, msg, retain, qos)

    def connect(self, clean_session=True):
        if self.lw is None:
            mqttbridge.connect(self.client_id, 60, "", False, 0)
        else:
            _outbox(self.lw[1])
            mqttbridge.connect(self.client_id, 60, self.lw[0], self.lw[2], self.lw[3])
        return 0

    def disconnect(self):
        mqttbridge.disconnect()

    def ping(self):
        pass

    def publish(self, topic, msg, retain=False, qos=0):
        _outbox(msg)
        mqttbridge.publish(topic if isinstance(topic, str) else topic.decode(), retain, qos)

    def subscribe(self, topic, qos=0):
        assert self.cb is not None, "Subscribe callback is not set"
        mqttbridge.subscribe(topic if isinstance(topic, str) else topic.decode(), qos)

    def check_msg(self):
        topic = mqttbridge.next()
        if topic is None:
            return None
        with open(INBOX, "rb") as f:
            msg = f.read()
        self.cb(topic.encode(), msg)

    wait_msg = check_msg
