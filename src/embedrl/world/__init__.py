"""The embedded synthetic world: scenes, clips and pages rendered from a seed, its retrieval tasks, the noisy
teacher that writes T-CoTs from the ground truth, the tiny backbone's pre-training on world media, and the world
evaluation (``embedrl eval world``).

Only :mod:`embedrl.demo` and :mod:`embedrl.cli` import this package; the library below it never does.
"""
