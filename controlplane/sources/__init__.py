"""Where policies come from: a folder of files, or Kubernetes."""
