"""The Ray layer: Ray Train (DDP) for squeeze and relabel, actors for recovery. The only package that imports ray.

Every function here wraps a pure-PyTorch core from `stages/`; outputs land in the same places as the in-process
path, so a stage may be run with Ray or without and resumed either way. Multi-node clusters need `output_dir`
(and `ray.storage_path`) on a filesystem every node sees: recovery actors write PNGs there and training workers
read the teacher from it.
"""
