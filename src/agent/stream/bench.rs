//! `bulwark bench stream`: throughput and ack latency of the stream over loopback TLS.
