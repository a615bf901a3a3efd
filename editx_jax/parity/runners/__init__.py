"""One runner per fixture component (registered in editx_jax.parity.gate.RUNNERS).

A runner takes a parity.Fixture, converts its weights with our converter, runs our module on its
inputs and returns the named arrays of its outputs.npz. Every size and count (decode steps, ODE steps,
cases) comes from the manifest (`config`, `call_args`) or the inputs, never from the expected outputs.
The gate runs each runner under parity.RUNNER_MATMUL_PRECISION.
"""
