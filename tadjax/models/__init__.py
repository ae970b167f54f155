"""tadjax.models"""
