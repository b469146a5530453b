"""Training: the Trainer (trainer), its losses (losses), the end of a multi-process run (distributed), what a
run writes (saving), what it reports (report)."""
