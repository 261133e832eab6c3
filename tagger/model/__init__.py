"""The genre model: a DenseNet over the representation, its bundle, training and inference."""
