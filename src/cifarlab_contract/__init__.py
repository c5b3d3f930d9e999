"""What training and serving share, torch-free (numpy and Pillow only): the ONNX model contract, the class list,
the drift statistics and their reference format, the feedback record format, and atomic file writes.

Both sides import this package; neither imports the other (tests/contract/test_import_arrows.py).
"""
