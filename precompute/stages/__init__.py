"""The precompute stages, one module each; `precompute.pipeline` wires them together."""
