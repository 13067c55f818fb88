"""What lets a user check ppml's word instead of taking it: signing keys and signed records."""
