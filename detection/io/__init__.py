"""File plumbing, one concern per module (import from the module, not from this package):

- :mod:`.files`: artifacts written atomically (temporary file + rename), npz read back, hashes;
- :mod:`.jsonfile`: strict JSON written atomically, untrusted JSON read with limits, settings keys;
- :mod:`.paths`: safe file names for names read from data, paths kept inside their folder, and
  why a path cannot be read.
"""
