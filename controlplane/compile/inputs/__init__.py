"""What compile reads: the policy store, the sidecar inventory (and which policies target
which sidecar), and the verdict types the extraction monitor hands back."""
