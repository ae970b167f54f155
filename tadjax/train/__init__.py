"""tadjax.train"""
