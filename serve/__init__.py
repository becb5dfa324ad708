"""ecomray on Ray Serve: the app (`serve.app:build_app`), one generic model deployment per route, the request guard."""
