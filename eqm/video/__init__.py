"""Video I/O with PyAV: metadata probing (probe.py) and clip reading / writing (io.py)."""
