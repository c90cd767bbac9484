"""Sources of NNR bytes for the decoder (files, MQTT, sockets) and, on the host, publishers."""
