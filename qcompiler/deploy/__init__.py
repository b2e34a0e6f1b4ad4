"""Deployment: Triton model repositories (``qcompile deploy``), a real Triton to test them, Netron (``qcompile view``)."""
