"""One module per backend with a `Contender` class the benchmark worker times."""
