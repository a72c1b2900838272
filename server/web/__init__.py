"""The admin enrollment station: Jinja2 pages and vanilla JS calling the JSON API."""
