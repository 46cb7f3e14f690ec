"""Planning for accelerators that are not attached: compile the TPU kernels and the whole
serving program for a chip or pod slice with libtpu's compiler on any host, and turn what the
compiler reports into HBM per chip, what fits, and step-time estimates (`jaxgen plan`).

`targets` (chips, slices, the one helper that tells Pallas the chip), `programs` (the serving
program on abstract inputs, compiled), `capacity` (HBM arithmetic and rooflines), `plan`
(`make_plan`), `cli` (`add_plan_parser`, `cmd_plan`), `model_shapes` (a model's config without
its weights).
"""
