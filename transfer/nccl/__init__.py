"""transfer.nccl: the NCCL payload path, GPU to GPU (protocol and public names: transport.py).

lib.py binds libnccl through ctypes; link.py is one 2-rank communicator per (prefill, decode)
pair with its streams and watchdog; sender.py and receiver.py are its two ends. Headers, acks
and errors stay on the pair's ZMQ socket (endpoint/).
"""
