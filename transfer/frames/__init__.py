"""transfer.frames: the frames payload path, the one every receiver takes (header `transport`
"zmq"; wire/framing.py describes its messages).

The payload travels on the pair's ZMQ socket itself as DATA messages, one per chunk of
buffers: sender.py (`FramesSender`) sends memoryviews of the cache (views) or of gathered
staging buffers zero-copy, gathering chunk i+1 while ZMQ's I/O thread sends chunk i;
receiver.py (`FramesReceiver`) writes each chunk through the transfer's writer as it comes.
Both implement the interfaces of payload/ and know nothing of the endpoints behind them.
"""
