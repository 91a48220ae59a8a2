"""Loss functions of the paper's algorithms, plain torch, testable without Ray."""
