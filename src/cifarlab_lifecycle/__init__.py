"""What happens to a model after training: the MLflow registry (registration, aliases, tags), promotion from
challenger to champion (offline on the test set, or online from an A/B test), retraining on the service's
feedback, and publishing the pipeline's model.

No Lightning and no training code: a model is scored by the evaluation configs/registry.yaml names (eval.py's),
and the registry's aliases come from that file too, for training, promotion, retraining and the A/B report alike.
"""
