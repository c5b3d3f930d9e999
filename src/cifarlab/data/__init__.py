"""CIFAR-10 data: preparing sources into verified arrays (prepare) and feeding them to training."""
