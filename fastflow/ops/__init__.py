"""Autograd-aware ops, registered with ``torch.library`` so ``torch.compile`` sees each as
one opaque node. One module per op family; ``fastflow.functional`` is the public face."""
