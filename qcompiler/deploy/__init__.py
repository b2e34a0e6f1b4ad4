"""Deployment: Triton model repositories (``qcompile deploy``), a real Triton to test them, and Netron (``qcompile view``)."""
