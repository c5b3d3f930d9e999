"""Export of trained networks to ONNX under the model contract (docs/model-contract.md)."""
