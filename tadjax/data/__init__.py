"""tadjax.data"""
