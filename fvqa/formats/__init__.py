"""File layouts fvqa reads and writes that other tools define (veRL's and upstream's rows)."""
