"""Many runs from one params file: sweeps (one run after another, or side by side on Ray) and self-improvement rounds."""
