"""Built-in models: a stochastic SEIR epidemic and a synthetic benchmark model."""
