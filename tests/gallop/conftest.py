"""Every gallop (model-level) test module that uses ``backend`` runs once per kernel backend: the reference, and
the Triton kernels through the interpreter. A write-back that depends on what one backend does and the other
doesn't is exactly what that catches."""
