"""SocialVPN: a private network of your XMPP friends."""

__version__ = "0.1.0"
