"""mlff-train's Hydra configs; shipped inside the wheel as ``mlff_distiller.conf``."""
