"""Fused cores as autograd Functions, one file per core, registered in kdfast.backends."""
