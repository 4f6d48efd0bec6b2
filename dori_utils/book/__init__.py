"""The book beside the library: what the chapters run with ``dori_utils`` and how the book is made.

- ``shared``: what several chapters run (the configuration, NeMo's neurons, the items chapters 2-4 attack and
  their triggers); ``chapter0`` ... ``chapter5``: each chapter's experiments, tables and claim checks;
  ``contrast``: chapter 1's contrast organism section;
- ``results``: the chapters' result logs, the cache (keyed by parameters, package version and library code) and
  the measured text; ``paper``: the paper's numbers; ``plots``: the figures;
- ``cli``: the ``dori-book`` command; ``costs``: the GPU cost table; ``pilots``: the organism's pilot trainings.

The library (``dori_utils`` outside this package) never imports from here: ``lint-imports`` checks it (the contract
is in ``pyproject.toml``).
"""
