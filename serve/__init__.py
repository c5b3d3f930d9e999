"""The inference service: a torch-free FastAPI server on ONNX Runtime for models exported under the model contract.

Entry point: `uvicorn serve.app:create_app --factory`. Everything about the model comes from its ONNX file and
its metadata (docs/model-contract.md); this package never imports torch or the training code.
"""
