"""`python -m csl_ray.config` prints the README's configuration reference table."""

from csl_ray.config.reference import reference_markdown

print(reference_markdown(), end="")
