"""Distillation you can trust: physical observables of a student next to its teacher."""
