"""teacherhack: distil language models while watching for teacher hacking.

The package follows the pipeline: data → models → divergences (losses and metrics) → sources →
training → metrics → detection → reports, composed by the `lab` recipe.
"""

__version__ = "0.1.0"
