"""Image classification: CIFAR and torchvision ResNets, cross-entropy, top-1."""
