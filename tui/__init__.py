"""`mlxqwen chat`: the terminal chat app (Textual). Start it with `mlxqwen chat [MODEL]`
or `mlxqwen.tui.app.ChatApp(model).run()`."""
