"""Generators: vLLM engines in Ray actors producing grouped rollouts, and the
receiving side of the weight-transfer protocol. Imports none of the other packages."""
