"""accelerando: make generative models faster without making them worse.

Subpackages are imported lazily so `import accelerando` stays fast:
``accelerando.llm`` (speculative decoding), ``accelerando.diffusion`` (fast samplers),
``accelerando.zoo`` (bundled tiny models), ``accelerando.bench`` (harness + history),
``accelerando.select`` (the meta-learned method selector).
"""

__version__ = "0.1.0"
