"""Device side of signed bundles: verify, download (resumable), stage, switch atomically, roll back."""
