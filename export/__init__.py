"""Workstation side (PyTorch + open_clip): the V-V visual tower, its ONNX export, the prompt embeddings."""
