"""transfer.nccl: the NCCL payload path, GPU to GPU (protocol and public names: transport.py;
header `transport` "nccl").

lib.py binds libnccl through ctypes; link.py is one 2-rank communicator per (prefill, decode)
pair with its streams and watchdog; sender.py (`NcclSenderPlugin`) and receiver.py
(`NcclReceiverPlugin`) are its two ends and implement the interfaces of payload/. Headers,
acks and errors stay on the pair's ZMQ socket (endpoint/).
"""
