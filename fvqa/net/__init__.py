"""Polite, bounded HTTP fetching: async downloader, private-address guard, robots.txt."""
