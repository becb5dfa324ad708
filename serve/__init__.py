"""ecomray on Ray Serve: the app (`serve.app:build_app`), one deployment per model family, the request guard."""
