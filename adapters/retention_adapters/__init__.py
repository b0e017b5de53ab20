"""Adapters of retention-engine to the platforms shops run: carts (Shopify,
WooCommerce), email platforms (SendGrid, Mandrill, Postmark), a CRM (HubSpot) and a
helpdesk (Zendesk). Each module is one plugin, found through the ``retention``
entry-point group; docs/adapters.md says what each maps and which settings it takes.
"""
