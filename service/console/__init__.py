"""The web console and the offline API reference: static files served by the API process."""
